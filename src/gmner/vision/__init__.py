"""The per-item vision stages (detect, caption, synthesize, features), their runner, content-addressed cache, image
inputs and model loaders."""
