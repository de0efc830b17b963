"""The chat page served at "/" by llm.serve (index.html; a package so that it ships in the wheel)."""
