"""Database access: the platform's tables, reconcile's own tables, engines and migrations."""
