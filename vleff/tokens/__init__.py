"""See the README architecture section."""
