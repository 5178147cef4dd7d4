"""podpatterns-copy-into DEST: copy this podpatterns tree into DEST (the copy-in).

The init container of a Pod whose app image has no Python runs this from the
podpatterns-tools image, with DEST a shared emptyDir; the app container mounts the same
volume at the tree's own path (/podpatterns), where the interpreter finds its loader
and libraries, and runs /podpatterns/bin/podpatterns. Files are copied with their modes
and symlinks, into a temporary directory first, then moved into place, so a restarted
init container never leaves a half-copied tree behind.

Exit codes: 0 copied, 2 usage error or DEST not a writable directory.
"""

import os
import shutil
import sys

TREE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print("usage: podpatterns-copy-into DEST (a writable directory)", file=sys.stderr)
        return 2
    dest = sys.argv[1]
    if not os.path.isdir(dest) or not os.access(dest, os.W_OK | os.X_OK):
        print(f"podpatterns-copy-into: DEST {dest!r} is not a writable directory", file=sys.stderr)
        return 2
    staging = os.path.join(dest, ".podpatterns-copy")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(TREE, staging, symlinks=True)
    for name in sorted(os.listdir(staging)):
        target = os.path.join(dest, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)
    files = (os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs)
    size = sum(os.lstat(f).st_size for f in files if not os.path.islink(f))
    print(f"podpatterns-copy-into: copied {TREE} to {dest} ({size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
