"""The model zoo: configs of named models built in code (meta device for planning), and the tiny LM trainer.
Imports nothing of memplan but errors and files."""
