"""The `bbsmall` command: chat, generate (batch), serve, convert, train, info."""
