"""maildir_system."""
