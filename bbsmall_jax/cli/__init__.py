"""The `bbsmall` command: chat, generate (batch), convert, train, info."""
