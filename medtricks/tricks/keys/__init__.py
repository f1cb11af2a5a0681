"""What a recipe reads of the built-in tricks whose code needs torch, timm or scikit-learn: each module declares
one trick -- its recipe keys under ``tricks:`` (a pydantic section whose every key says what it means), its
``ablate --tricks`` names and its tag -- and imports none of those libraries, so reading, checking or printing a
recipe stays light (``medtricks run RECIPE --dry-run``; tests/recipe/test_recipe_parse_cost.py).

The points that act on a run are in the trick's module one level up (``keys/bn_gamma.py`` declares what
:mod:`medtricks.tricks.bn_gamma` does), in a subclass of the class declared here; a run imports it when it builds
its tricks (:meth:`~medtricks.tricks.base.Trick.implementation`). The registry imports these modules
(:mod:`medtricks.tricks.registry`).
"""
