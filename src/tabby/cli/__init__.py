"""Command-line entry points: tabbyctl (the user's CLI) and tabby (agent, controller)."""
