"""The one streaming loop every command runs (``execute.run``) and what it knows of a plan."""
