"""The floor every wing stands on: errors, atomic files, logs, progress, sizes, metrics, figures, the
runtime (device, precision, seeds), distributed helpers and checkpoints. Imports nothing above it."""
