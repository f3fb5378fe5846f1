"""Slide input: open any slide, read regions at a level, find slides in folders."""

from hpcpath.io.discover import SLIDE_SUFFIXES, discover_slides
from hpcpath.io.slide import Slide, SlideInfo, open_slide, slide_id_for

__all__ = ["Slide", "SlideInfo", "open_slide", "slide_id_for", "discover_slides", "SLIDE_SUFFIXES"]
