"""The chapters, as notebooks; a package only so that their conftest.py gets its own module name (tests/ has one too)."""
