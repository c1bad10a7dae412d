"""DVC stage `pretrain`: vision-to-text alignment pre-training (DLRAM + VTC objectives) into models/pretrain,
logging each loss component to dvclive/pretrain."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("pretrain")
