"""Training: the validated run config, the trainer and its loop, optimiser, losses, time budget, K folds,
experiment tracking, and the planner (dataset fingerprint + machine probe -> a recipe) that never imports
the trainer."""
