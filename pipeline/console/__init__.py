"""The web console: static files (plain ES modules, no build step) served by the worker under /console/."""

from pathlib import Path

STATIC_DIR = Path(__file__).with_name("static")
