"""`python -m toyworld`: generate the toy world (see `world.main`)."""
import sys

from toyworld.world import main

sys.exit(main())
