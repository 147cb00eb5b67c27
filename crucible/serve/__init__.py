"""Chatting with a model: the terminal REPL and the OpenAI-compatible server with its web page."""
