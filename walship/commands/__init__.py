"""Commands that are more than a call into the archive core."""
