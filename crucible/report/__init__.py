"""Plots and HTML/Markdown rendering shared by every command."""
