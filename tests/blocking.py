"""Source code for a subprocess in which some packages cannot be imported (what a device without
the search stack has). Shared by the tests that check the torch-only core and the planner; a
helper module, not a test module."""


def import_blocker(blocked) -> str:
    """Python source that makes importing any of the top-level packages in `blocked` fail (and
    forgets those already imported); prepend it to the code a subprocess runs. Defines BLOCKED."""
    return f'''
import sys
BLOCKED = {set(blocked)!r}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())
for _name in list(sys.modules):
    if _name.split(".")[0] in BLOCKED:
        del sys.modules[_name]
'''
