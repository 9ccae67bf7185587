"""The bridge's client edge: which connections it takes, HTTP, and the page's static files."""
