"""What every entry point shares, below them all: loading a chat model and answering with it (`responder.py`,
`models.py`), scoring replies (`scoring.py`), dialogue examples and their tokenization (`examples.py`), the
compute dtype (`precision.py`) and coordinating processes (`coordination.py`)."""
