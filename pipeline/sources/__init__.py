"""Data sources: FastF1 sessions (export, replay); the F1 game UDP feed later."""
