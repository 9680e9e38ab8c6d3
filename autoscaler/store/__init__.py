"""State kept in SQL: SQLite by default, PostgreSQL when scaled out (SQLAlchemy async)."""
