"""The care team's pages (``/ui``): server-rendered (Jinja2), SVG charts drawn on the
server, no script and nothing fetched from another host."""
