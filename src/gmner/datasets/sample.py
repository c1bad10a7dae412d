"""The embedded sample dataset: a small, deterministic, synthetic Twitter-GMNER set drawn with PIL.

Layout, as in Twitter10000 v2.0::

    <out>/train.txt, dev.txt, test.txt   CoNLL: ``IMGID:<id>``, one ``token<TAB>tag`` line per word
                                         (BIO over PER, LOC, ORG, OTHER), a blank line after each tweet
    <out>/xml/<id>.xml                   Pascal VOC, only for images with a groundable entity; one
                                         <object> per box, <name> = the entity's words joined by spaces
    <out>/images/<id>.jpg                the tweet's image; about 5 % of tweets have none

The task is learnable by construction, and the rules below are what a model can learn:

- An entity is *drawn* (groundable) when its image shows an object for it. The object's shape class
  tells the type: PER a person figure; LOC a mountain or a map pin; ORG a building or a logo board;
  OTHER a ball, a bottle or a star. Colours, sizes and positions are random, so only shape matters.
- Drawn entities appear left to right in the order they are mentioned, so two drawn entities of the
  same type (or two ambiguous names) can be told apart. A few entities are drawn twice, side by side
  in the same colours (two boxes). Every mention of a name shares its boxes (a ``# Name`` hashtag may
  repeat an entity).
- In a tweet, the entities of one type are drawn or not drawn together; in a tweet that names an
  ambiguous name, all entities are drawn or none is. So whether an entity is drawn, and which object
  is its own, is always decidable from text and image together.
- Distractors (objects no entity names) are a tree, a cloud, a car or a flower, or, in tweets without
  ambiguous names, the shape of a type that no entity of the tweet has.
- About 10 % of images are irrelevant (an abstract texture: no object, no xml) and about 5 % of tweets
  have no image file at all; their entities are ungroundable. Overall about half of the entities are
  groundable.
- Text: tweet-like (``RT @ user :``, ``# tag``, urls). Most names come from per-type pools and sit in
  templates with strong type cues; names from :data:`AMBIGUOUS` are used with several types and only
  in neutral templates, so for them only the image tells the type, and only when they are drawn.

Each tweet draws from its own generator seeded by (seed, split, index), so a split's content does
not depend on the sizes of the others, and the same arguments give byte-identical files.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from xml.sax.saxutils import escape

from PIL import Image, ImageDraw, ImageFilter

from gmner.core.atomic import atomic_dir
from gmner.core.bio import tags_from_spans
from gmner.core.params import check_keys

PARAMS = ("seed", "train", "dev", "test", "image_size")  # the keys of the `sample` params group

SAMPLE_DIR = Path("data/sample")
TYPES = ("PER", "LOC", "ORG", "OTHER")
JPEG_QUALITY = 80

P_NO_IMAGE = 0.05
P_IRRELEVANT = 0.10
P_DRAWN = 0.58  # per type group of a tweet with a scene: gives about half of all entities groundable
P_AMBIGUOUS = 0.3
P_NEUTRAL = 0.2  # a pool name in a neutral template: its type then comes from the name alone
P_TWO_BOXES = 0.12
P_HASHTAG_REPEAT = 0.06
MAX_OBJECTS = 5
MIN_SIDE = 4  # pixels; with MAX_OBJECTS columns this needs images of at least MIN_IMAGE_SIZE
MIN_IMAGE_SIZE = 64

# Names used for several types; each appears with any of its types, always in neutral context.
AMBIGUOUS: dict[str, tuple[str, ...]] = {
    "Jordan": ("PER", "LOC", "OTHER"),
    "Phoenix": ("PER", "LOC", "ORG"),
    "Madison": ("PER", "LOC"),
    "Chelsea": ("PER", "LOC", "ORG"),
    "Lincoln": ("PER", "LOC", "OTHER"),
    "Victoria": ("PER", "LOC", "ORG"),
    "Mercury": ("PER", "ORG", "OTHER"),
    "Amazon": ("LOC", "ORG", "OTHER"),
    "Orlando": ("PER", "LOC", "ORG"),
    "Apple": ("ORG", "OTHER"),
    "Austin": ("PER", "LOC"),
    "Georgia": ("PER", "LOC"),
    "Jaguar": ("ORG", "OTHER"),
    "Dallas": ("PER", "LOC", "ORG"),
    "Hudson": ("PER", "LOC", "ORG"),
    "Santa Fe": ("LOC", "OTHER"),
}

FIRST_NAMES = (
    "Kevin Maria Tyler Aisha Diego Priya Liam Sofia Marcus Hannah Omar Chloe Ethan Yuki Noah Elena "
    "Andre Grace Mateo Zoe Rafael Nadia Owen Leila"
).split()
LAST_NAMES = (
    "Brooks Okafor Lindqvist Moreno Patel Nakamura Fischer Duarte Kowalski Bennett Haddad Reyes "
    "Sullivan Ferreira Novak Tanaka Castillo Whitaker"
).split()
POOLS: dict[str, tuple[str, ...]] = {
    "LOC": (
        "Boston", "Lisbon", "Nairobi", "Denver", "Oslo", "Kyoto", "Texas", "Brazil", "Lake Tahoe",
        "New Mexico", "Cape Town", "Hyde Park", "Santa Monica", "Hong Kong", "Bavaria", "Mount Hood",
        "Yorkshire", "Quebec", "Manila", "Rocky Mountains", "Lagos", "Peru",
    ),
    "ORG": (
        "NASA", "Red Cross", "Greenpeace", "UNICEF", "BBC", "NBA", "FIFA", "Riverside Rovers",
        "Metro Transit", "Ocean Tech", "Summit Bank", "Pine Valley High", "Silver Arrows",
        "City Council", "Northwind Airlines", "Harbor FC", "Channel 9", "Oakridge University",
    ),
    "OTHER": (
        "Super Bowl", "World Cup", "Comic Con", "Xbox", "iPhone", "Frosty Cola", "Thunder Run",
        "Star Quest", "Grammys", "Oscars", "Nova Sneakers", "Easter", "Game of Crowns", "PlayStation",
        "Tour de France", "Moon Pie",
    ),
}

STRONG: dict[str, tuple[str, ...]] = {
    "PER": (
        "happy birthday to {} !", "{} scored twice last night", "great interview with {} on the show",
        "congrats to {} on the award", "{} signs autographs for fans", "coach {} speaks after the game",
        "met {} backstage tonight", "{} says they are ready for the final", "{} and family at the premiere",
    ),
    "LOC": (
        "heavy snow in {} tonight", "finally landed in {}", "road trip to {} this weekend",
        "sunset over {} is unreal", "live from downtown {}", "weather alert for {} residents",
        "hiking near {} today", "flooding reported across {}",
    ),
    "ORG": (
        "{} announced new jobs today", "shares of {} rise after earnings", "{} fans celebrate the win",
        "proud to volunteer with {}", "{} statement on the merger", "{} board meets on friday",
        "{} signs a new sponsorship deal",
    ),
    "OTHER": (
        "just bought the new {}", "who is watching {} tonight ?", "tickets for {} sold out",
        "the {} trailer looks amazing", "unboxing my {} lol", "cannot wait for {} next week",
        "{} review is up now",
    ),
}
NEUTRAL = (
    "look at {} today", "all about {} this week", "{} !", "so much love for {}", "thoughts on {} ?",
    "still thinking about {}", "{} is trending again", "this is {}", "new photo of {}", "{} right now",
    "can we talk about {}", "nothing beats {}",
)
HANDLE_PARTS = "news daily jen mike the real fan club sports cityhub pix nyc tv live best 24 99 hq".split()
HASHTAGS = (
    "news tbt love weekend photooftheday breaking travel sports music tech goals throwback "
    "mondaymotivation instagood"
).split()
JOINERS = (".", ",", "and", "-", "|", "!")

SHAPES_BY_TYPE: dict[str, tuple[str, ...]] = {
    "PER": ("person",),
    "LOC": ("mountain", "pin"),
    "ORG": ("building", "board"),
    "OTHER": ("ball", "bottle", "star"),
}
NEUTRAL_SHAPES = ("tree", "cloud", "car", "flower")

Box = tuple[int, int, int, int]  # xmin, ymin, xmax, ymax in pixels
RGB = tuple[int, int, int]


@dataclass
class _Entity:
    words: tuple[str, ...]
    type: str
    ambiguous: bool
    spans: list[tuple[int, int]] = field(default_factory=list)
    drawn: bool = False
    boxes: list[Box] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.words)


@dataclass
class _Tweet:
    id: str
    tokens: list[str]
    entities: list[_Entity]
    image: str | None  # "scene", "irrelevant" or None (no image file)


# ---------------------------------------------------------------- text


def _pick_entities(rng: random.Random) -> list[_Entity]:
    count = rng.choices((1, 2, 3), weights=(0.5, 0.35, 0.15))[0]
    entities: list[_Entity] = []
    used: set[str] = set()
    while len(entities) < count:
        if rng.random() < P_AMBIGUOUS:
            name = rng.choice(sorted(AMBIGUOUS))
            entity = _Entity(tuple(name.split()), rng.choice(AMBIGUOUS[name]), True)
        else:
            etype = rng.choices(TYPES, weights=(0.35, 0.25, 0.2, 0.2))[0]
            if etype == "PER":  # "First Last" or just "Last", as tweets often name people
                words = (rng.choice(LAST_NAMES),)
                if rng.random() < 0.5:
                    words = (rng.choice(FIRST_NAMES), *words)
            else:
                words = tuple(rng.choice(POOLS[etype]).split())
            entity = _Entity(words, etype, False)
        # No shared words between names, so a name never occurs inside another one of the same tweet.
        if used.isdisjoint(entity.words):
            used.update(entity.words)
            entities.append(entity)
    return entities


def _handle(rng: random.Random) -> str:
    return "".join(rng.sample(HANDLE_PARTS, rng.randint(1, 3))) + rng.choice(("", "_", str(rng.randint(1, 99))))


def _url(rng: random.Random) -> str:
    chars = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "http://t.co/" + "".join(rng.choice(chars) for _ in range(8))


def _compose(rng: random.Random, entities: list[_Entity]) -> list[str]:
    """Tweet tokens; records each entity's word spans on the entity."""
    tokens: list[str] = []
    if rng.random() < 0.35:
        tokens += ["RT", "@", _handle(rng), ":"]
    elif rng.random() < 0.1:
        tokens += ["@", _handle(rng)]
    for i, entity in enumerate(entities):
        if i:
            tokens.append(rng.choice(JOINERS))
        neutral = entity.ambiguous or rng.random() < P_NEUTRAL
        template = rng.choice(NEUTRAL if neutral else STRONG[entity.type])
        for word in template.split():
            if word == "{}":
                entity.spans.append((len(tokens), len(tokens) + len(entity.words)))
                tokens += entity.words
            else:
                tokens.append(word)
    single = [e for e in entities if len(e.words) == 1]
    if single and rng.random() < P_HASHTAG_REPEAT:
        entity = rng.choice(single)
        tokens.append("#")
        entity.spans.append((len(tokens), len(tokens) + 1))
        tokens += entity.words
    for tag in rng.sample(HASHTAGS, rng.choice((0, 0, 1, 1, 2))):
        tokens += ["#", tag]
    if rng.random() < 0.15:
        tokens.append(_url(rng))
    return tokens


# ---------------------------------------------------------------- drawing


def _color(rng: random.Random, light: bool = False) -> RGB:
    if light:
        hsv = (rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.88, 1.0))
    else:
        hsv = (rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.3, 0.85))
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(*hsv))  # type: ignore[return-value]


SKIN = ((241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172))


def _fit(points: list[tuple[float, float]], box: Box) -> list[tuple[float, float]]:
    """Scale a polygon so that its extreme points touch the box edges."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / (max(xs) - min(xs)), (y1 - y0) / (max(ys) - min(ys))
    return [(x0 + (x - min(xs)) * sx, y0 + (y - min(ys)) * sy) for x, y in points]


def _person(d: ImageDraw.ImageDraw, box: Box, main: RGB, second: RGB, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    head = min(w * 0.55, h * 0.28)
    d.ellipse((cx - head / 2, y0, cx + head / 2, y0 + head), fill=rng.choice(SKIN))
    top, hip = y0 + head + max(1, h * 0.03), y0 + h * 0.66
    d.rectangle((x0, top, x0 + w * 0.17, y0 + h * 0.6), fill=main)  # arms
    d.rectangle((x1 - w * 0.17, top, x1, y0 + h * 0.6), fill=main)
    d.rounded_rectangle((x0 + w * 0.2, top, x1 - w * 0.2, hip), radius=max(1, w * 0.08), fill=main)
    d.rectangle((x0 + w * 0.22, hip, cx - w * 0.03, y1), fill=second)  # legs
    d.rectangle((cx + w * 0.03, hip, x1 - w * 0.22, y1), fill=second)


def _mountain(d: ImageDraw.ImageDraw, box: Box, main: RGB, second: RGB, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    peak = x0 + w * rng.uniform(0.35, 0.65)
    if rng.random() < 0.6:  # a lower second peak behind
        side = x0 + w * rng.choice((0.22, 0.78))
        d.polygon([(max(x0, side - w * 0.3), y1), (side, y0 + h * 0.4), (min(x1, side + w * 0.3), y1)], fill=second)
    d.polygon([(x0, y1), (peak, y0), (x1, y1)], fill=main)
    t = 0.25
    cap = [(peak, y0), (peak + (x0 - peak) * t, y0 + h * t), (peak + (x1 - peak) * t, y0 + h * t)]
    d.polygon(cap, fill=(245, 245, 250))
    # The outline keeps the peak visible where the snow cap meets a pale sky.
    d.polygon([(x0, y1), (peak, y0), (x1, y1)], outline=tuple(c // 2 for c in main), width=max(1, round(w / 40)))


def _pin(d: ImageDraw.ImageDraw, box: Box, main: RGB, second: RGB, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, cx = x1 - x0, (x0 + x1) / 2
    d.polygon([(x0 + w * 0.08, y0 + w * 0.62), (x1 - w * 0.08, y0 + w * 0.62), (cx, y1)], fill=main)
    d.ellipse((x0, y0, x1, y0 + w), fill=main)
    r = w * 0.18
    d.ellipse((cx - r, y0 + w / 2 - r, cx + r, y0 + w / 2 + r), fill=(250, 250, 250))


def _building(d: ImageDraw.ImageDraw, box: Box, main: RGB, second: RGB, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d.rectangle(box, fill=main)
    d.rectangle((x0, y0, x1, y0 + h * 0.07), fill=second)  # roof band
    cols, rows = max(2, round(w / 9)), max(3, round(h / 11))
    cw, rh = w / cols, (h * 0.78) / rows
    for r in range(rows):
        for c in range(cols):
            wx, wy = x0 + c * cw, y0 + h * 0.1 + r * rh
            d.rectangle((wx + cw * 0.25, wy + rh * 0.2, wx + cw * 0.75, wy + rh * 0.75), fill=(235, 240, 200))
    d.rectangle(((x0 + x1) / 2 - w * 0.1, y1 - h * 0.1, (x0 + x1) / 2 + w * 0.1, y1), fill=second)


def _board(d: ImageDraw.ImageDraw, box: Box, main: RGB, second: RGB, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    bottom = y0 + h * 0.62
    d.rectangle((cx - w * 0.06, bottom, cx + w * 0.06, y1), fill=(90, 90, 90))  # pole
    d.rectangle((x0, y0, x1, bottom), fill=main)
    r = min(w * 0.16, (bottom - y0) * 0.32)
    ly = (y0 + bottom) / 2
    d.ellipse((x0 + w * 0.2 - r, ly - r, x0 + w * 0.2 + r, ly + r), fill=second)
    for k in (-1, 1):  # lettering
        by = ly + k * (bottom - y0) * 0.16
        d.rectangle((x0 + w * 0.45, by - h * 0.035, x1 - w * 0.1, by + h * 0.035), fill=(250, 250, 250))


def _ball(d: ImageDraw.ImageDraw, box: Box, main: RGB, second: RGB, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d.ellipse(box, fill=main)
    line = max(1, round(w / 16))
    d.arc((x0 - w * 0.5, y0 + h * 0.1, x0 + w * 0.5, y1 - h * 0.1), -70, 70, fill=second, width=line)
    d.arc((x1 - w * 0.5, y0 + h * 0.1, x1 + w * 0.5, y1 - h * 0.1), 110, 250, fill=second, width=line)
    d.line((x0 + w * 0.05, (y0 + y1) / 2, x1 - w * 0.05, (y0 + y1) / 2), fill=second, width=line)


def _bottle(d: ImageDraw.ImageDraw, box: Box, main: RGB, second: RGB, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    d.rounded_rectangle((x0, y0 + h * 0.36, x1, y1), radius=max(1, w * 0.15), fill=main)
    shoulders = [(x0, y0 + h * 0.4), (cx - w * 0.2, y0 + h * 0.2), (cx + w * 0.2, y0 + h * 0.2), (x1, y0 + h * 0.4)]
    d.polygon(shoulders, fill=main)
    d.rectangle((cx - w * 0.18, y0 + h * 0.06, cx + w * 0.18, y0 + h * 0.22), fill=main)
    d.rectangle((cx - w * 0.2, y0, cx + w * 0.2, y0 + h * 0.07), fill=second)  # cap
    d.rectangle((x0, y0 + h * 0.55, x1, y0 + h * 0.75), fill=(245, 245, 235))  # label
    d.rectangle((x0 + w * 0.2, y0 + h * 0.62, x1 - w * 0.2, y0 + h * 0.68), fill=second)


def _star(d: ImageDraw.ImageDraw, box: Box, main: RGB, second: RGB, rng: random.Random) -> None:
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else 0.45
        angle = math.pi * (-0.5 + k / 5)
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    d.polygon(_fit(points, box), fill=main, outline=second, width=max(1, round((box[2] - box[0]) / 20)))


def _tree(d: ImageDraw.ImageDraw, box: Box, main: RGB, second: RGB, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    d.rectangle((cx - w * 0.1, y0 + h * 0.55, cx + w * 0.1, y1), fill=(110, 72, 40))
    green = (rng.randint(30, 90), rng.randint(120, 190), rng.randint(30, 90))
    d.ellipse((x0, y0, x1, y0 + h * 0.68), fill=green)


def _cloud(d: ImageDraw.ImageDraw, box: Box, main: RGB, second: RGB, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    grey = rng.randint(150, 200)
    fill = (grey, grey + 10, min(255, grey + 40))
    d.ellipse((x0, y0 + h * 0.35, x0 + w * 0.5, y1), fill=fill)
    d.ellipse((x0 + w * 0.5, y0 + h * 0.3, x1, y1), fill=fill)
    d.ellipse((x0 + w * 0.22, y0, x0 + w * 0.78, y1 - h * 0.1), fill=fill)


def _car(d: ImageDraw.ImageDraw, box: Box, main: RGB, second: RGB, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cabin = [(x0 + w * 0.22, y0 + h * 0.4), (x0 + w * 0.32, y0), (x1 - w * 0.3, y0), (x1 - w * 0.18, y0 + h * 0.4)]
    d.polygon(cabin, fill=main)
    d.rounded_rectangle((x0, y0 + h * 0.35, x1, y0 + h * 0.78), radius=max(1, h * 0.1), fill=main)
    wheel = h * 0.4
    for wx in (x0 + w * 0.12, x1 - w * 0.12 - wheel):
        d.ellipse((wx, y1 - wheel, wx + wheel, y1), fill=(30, 30, 30))


def _flower(d: ImageDraw.ImageDraw, box: Box, main: RGB, second: RGB, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, cx = x1 - x0, (x0 + x1) / 2
    d.line((cx, y0 + w / 2, cx, y1), fill=(40, 140, 50), width=max(1, round(w / 10)))
    cy, r = y0 + w / 2, w * 0.22
    for k in range(5):
        a = math.pi * (-0.5 + 2 * k / 5)
        px, py = cx + (w / 2 - r) * math.cos(a), cy + (w / 2 - r) * math.sin(a)
        d.ellipse((px - r, py - r, px + r, py + r), fill=main)
    d.ellipse((cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8), fill=(250, 210, 40))


# shape class -> (height / width, drawing function)
SHAPES: dict[str, tuple[float, Callable[..., None]]] = {
    "person": (2.0, _person),
    "mountain": (0.75, _mountain),
    "pin": (1.45, _pin),
    "building": (1.5, _building),
    "board": (1.15, _board),
    "ball": (1.0, _ball),
    "bottle": (2.3, _bottle),
    "star": (1.0, _star),
    "tree": (1.5, _tree),
    "cloud": (0.6, _cloud),
    "car": (0.55, _car),
    "flower": (1.7, _flower),
}


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """A light, softly textured backdrop: a vertical gradient between two pale colours and faint blobs."""
    top, bottom = _color(rng, light=True), _color(rng, light=True)
    mask = Image.linear_gradient("L").resize((width, height))
    image = Image.composite(Image.new("RGB", (width, height), bottom), Image.new("RGB", (width, height), top), mask)
    d = ImageDraw.Draw(image)
    for _ in range(rng.randint(4, 10)):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.25) * width
        d.ellipse((cx - r, cy - r * 0.6, cx + r, cy + r * 0.6), fill=_color(rng, light=True))
    if rng.random() < 0.5:  # a ground band
        d.rectangle((0, height * rng.uniform(0.7, 0.85), width, height), fill=_color(rng, light=True))
    return image.filter(ImageFilter.GaussianBlur(max(1, width / 40)))


def _abstract(rng: random.Random, width: int, height: int) -> Image.Image:
    """An irrelevant image: blurred bands of colour, nothing a type's shape could be mistaken for."""
    image = Image.new("RGB", (width, height), _color(rng))
    d = ImageDraw.Draw(image)
    for _ in range(rng.randint(5, 10)):
        x, dx = rng.uniform(-width, width), rng.uniform(-width, width)
        band = rng.uniform(0.05, 0.2) * width
        d.polygon([(x, 0), (x + band, 0), (x + dx + band, height), (x + dx, height)], fill=_color(rng))
    return image.filter(ImageFilter.GaussianBlur(max(1, width / 25)))


def _layout(rng: random.Random, width: int, height: int, shapes: list[str]) -> list[Box]:
    """One box per shape, each in its own column, so list order is left-to-right order."""
    margin = max(1, round(width * 0.03))
    weights = [rng.uniform(0.7, 1.3) for _ in shapes]
    cum = [sum(weights[:i]) / sum(weights) for i in range(len(shapes) + 1)]
    edges = [margin + round(c * (width - 2 * margin)) for c in cum]
    boxes = []
    for shape, left, right in zip(shapes, edges, edges[1:]):
        aspect = SHAPES[shape][0]
        # A random area rather than a random width, so wide and tall shapes are equally prominent.
        area = width * height * rng.uniform(0.03, 0.1)
        w = min(math.sqrt(area / aspect), (right - left) * 0.95)
        h = min(w * aspect, height - 2 * margin)
        w = min(w, h / aspect)
        w, h = min(right - left, max(MIN_SIDE, round(w))), max(MIN_SIDE, round(h))
        x0 = rng.randint(left, right - w)
        y0 = rng.randint(margin, height - margin - h)
        boxes.append((x0, y0, x0 + w, y0 + h))
    return boxes


def _scene(rng: random.Random, width: int, height: int, entities: list[_Entity]) -> Image.Image:
    """Draw the drawn entities (left to right in mention order) among distractors; fills entity boxes."""
    # Units of (entity or None, shape, colours): one per entity (two objects when drawn twice) or distractor.
    units: list[list[tuple[_Entity | None, str, tuple[RGB, RGB]]]] = []
    drawn = [e for e in entities if e.drawn]
    for i, entity in enumerate(drawn):
        shape, colors = rng.choice(SHAPES_BY_TYPE[entity.type]), (_color(rng), _color(rng))
        room = MAX_OBJECTS - sum(map(len, units)) - (len(drawn) - i)  # spare objects once each entity has one
        units.append([(entity, shape, colors)] * (2 if room > 0 and rng.random() < P_TWO_BOXES else 1))
    tweet_types = {e.type for e in entities}
    allow_typed = not any(e.ambiguous for e in entities) and len(tweet_types) < len(TYPES)
    distractors = rng.choice((0, 1, 1, 2, 2)) if units else rng.choice((1, 2))  # a scene is never empty
    for _ in range(min(distractors, MAX_OBJECTS - sum(map(len, units)))):
        if allow_typed and rng.random() < 0.3:
            shape = rng.choice(SHAPES_BY_TYPE[rng.choice([t for t in TYPES if t not in tweet_types])])
        else:
            shape = rng.choice(NEUTRAL_SHAPES)
        units.insert(rng.randint(0, len(units)), [(None, shape, (_color(rng), _color(rng)))])
    objects = [obj for unit in units for obj in unit]
    image = _background(rng, width, height)
    d = ImageDraw.Draw(image)
    for (entity, shape, (main, second)), box in zip(objects, _layout(rng, width, height, [o[1] for o in objects])):
        SHAPES[shape][1](d, box, main, second, rng)
        if entity is not None:
            entity.boxes.append(box)
    return image


# ---------------------------------------------------------------- files


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:0", optimize=False, progressive=False)
    return buf.getvalue()


def _voc_xml(image_id: str, width: int, height: int, entities: list[_Entity]) -> str:
    lines = [
        "<annotation>",
        "\t<folder>sample</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        f"\t<path>images/{image_id}.jpg</path>",
        "\t<source>",
        "\t\t<database>gmner synthetic sample</database>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for entity in entities:
        for x0, y0, x1, y1 in entity.boxes:
            truncated = int(x0 <= 0 or y0 <= 0 or x1 >= width or y1 >= height)
            lines += [
                "\t<object>",
                f"\t\t<name>{escape(entity.text)}</name>",
                "\t\t<pose>Unspecified</pose>",
                f"\t\t<truncated>{truncated}</truncated>",
                "\t\t<difficult>0</difficult>",
                "\t\t<bndbox>",
                f"\t\t\t<xmin>{x0}</xmin>",
                f"\t\t\t<ymin>{y0}</ymin>",
                f"\t\t\t<xmax>{x1}</xmax>",
                f"\t\t\t<ymax>{y1}</ymax>",
                "\t\t</bndbox>",
                "\t</object>",
            ]
    return "\n".join(lines + ["</annotation>", ""])


def _conll(tweets: list[_Tweet]) -> str:
    out = []
    for tweet in tweets:
        spans = [(s, e, ent.type) for ent in tweet.entities for s, e in ent.spans]
        tags = tags_from_spans(len(tweet.tokens), spans)
        out.append(f"IMGID:{tweet.id}\n")
        out += [f"{tok}\t{tag}\n" for tok, tag in zip(tweet.tokens, tags)]
        out.append("\n")
    return "".join(out)


def _make_tweet(rng: random.Random, image_id: str) -> _Tweet:
    entities = _pick_entities(rng)
    tokens = _compose(rng, entities)
    roll = rng.random()
    image = None if roll < P_NO_IMAGE else "irrelevant" if roll < P_NO_IMAGE + P_IRRELEVANT else "scene"
    if image == "scene":
        # Drawn together: the entities of one type, or all of them when a name is ambiguous (module doc).
        together = any(e.ambiguous for e in entities)
        drawn = {key: rng.random() < P_DRAWN for key in (("all",) if together else TYPES)}
        for e in entities:
            e.drawn = drawn["all" if together else e.type]
    return _Tweet(image_id, tokens, entities, image)


def _image_size(rng: random.Random, size: int) -> tuple[int, int]:
    short = round(size * 0.75)
    return rng.choices(((size, size), (size, short), (short, size)), weights=(0.4, 0.4, 0.2))[0]


def _write_split(root: Path, split: str, ids: list[str], seed: int, image_size: int) -> dict[str, int]:
    counts = dict.fromkeys(
        ("tweets", "entities", "groundable", "ambiguous", "boxes", "images", "no_image", "irrelevant", "xml"), 0
    )
    tweets = []
    for index, image_id in enumerate(ids):
        rng = random.Random(f"gmner-sample/{seed}/{split}/{index}")
        tweet = _make_tweet(rng, image_id)
        width, height = _image_size(rng, image_size)
        if tweet.image is not None:
            if tweet.image == "scene":
                image = _scene(rng, width, height, tweet.entities)
            else:
                image = _abstract(rng, width, height)
            (root / "images" / f"{image_id}.jpg").write_bytes(_jpeg(image))
        if any(e.boxes for e in tweet.entities):
            xml = _voc_xml(image_id, width, height, tweet.entities)
            (root / "xml" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
            counts["xml"] += 1
        tweets.append(tweet)
        counts["tweets"] += 1  # entity counts are per mention, as a reader of the files counts them
        counts["entities"] += sum(len(e.spans) for e in tweet.entities)
        counts["groundable"] += sum(len(e.spans) for e in tweet.entities if e.boxes)
        counts["ambiguous"] += sum(len(e.spans) for e in tweet.entities if e.ambiguous)
        counts["boxes"] += sum(len(e.boxes) for e in tweet.entities)
        counts["images"] += tweet.image is not None
        counts["no_image"] += tweet.image is None
        counts["irrelevant"] += tweet.image == "irrelevant"
    (root / f"{split}.txt").write_text(_conll(tweets), encoding="utf-8")
    return counts


def generate(out_dir: Path, *, seed: int, sizes: dict[str, int], image_size: int) -> dict[str, dict[str, int]]:
    """Write the sample dataset to ``out_dir`` (replaced as a whole) and return counts per split.

    ``sizes`` maps split name to number of tweets (``{"train": 320, "dev": 80, "test": 80}``);
    ``image_size`` is the long side of every image in pixels. Tweet ids are unique across splits.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"sample image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if any(not isinstance(n, int) or n < 0 for n in sizes.values()):
        raise ValueError(f"sample sizes must be non-negative integers, got {sizes}")
    total = sum(sizes.values())
    if total > 900_000:
        raise ValueError(f"sample too large: {total} tweets (ids are six digits)")
    ids = [str(i) for i in random.Random(f"gmner-sample/{seed}/ids").sample(range(100_000, 1_000_000), total)]
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "xml").mkdir()
        summary, start = {}, 0
        for split, n in sizes.items():
            summary[split] = _write_split(tmp, split, ids[start : start + n], seed, image_size)
            start += n
    return summary


def run_stage(params: dict) -> None:
    """DVC stage ``sample``: generate data/sample/ from the ``sample`` params and print the summary."""
    p = params["sample"]
    check_keys("sample", p, PARAMS)
    sizes = {split: int(p[split]) for split in ("train", "dev", "test")}
    summary = generate(SAMPLE_DIR, seed=int(p["seed"]), sizes=sizes, image_size=int(p["image_size"]))
    print(json.dumps(summary, indent=2))
