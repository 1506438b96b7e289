"""UniSD self-distillation: the recipe (unisd.train), its components (unisd.components) and the
SD baselines (unisd.baselines).  See docs/unisd.md."""
