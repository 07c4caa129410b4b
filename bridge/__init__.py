"""What the dock (ui/) and the Processing algorithms share; their one way into core/."""
