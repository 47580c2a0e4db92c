"""Training: the loop (`trainer`), the step it repeats (`step`) and what they stand on."""
