"""HTTP routes: each translates HTTP <-> engine calls and nothing more."""
