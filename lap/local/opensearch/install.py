"""Assemble LAP's local OpenSearch node from what Maven fetched (pom.xml beside this file); `make` runs it.

usage: python install.py DOWNLOADS TARGET VERSION

DOWNLOADS holds the distribution zip and the reindex module's jars with their
dependencies. The node is unpacked into a side folder and renamed to TARGET
when complete, so an interrupted install leaves nothing half-made. Standard
library only: it runs before LAP's virtualenv exists.
"""

from __future__ import annotations

import re
import shutil
import stat
import sys
import zipfile
from pathlib import Path

# OpenSearch loads a module from a folder of jars with this descriptor; the module's own jar is published as
# reindex-client, without it.
REINDEX_DESCRIPTOR = """\
description=The reindex module: delete by query, update by query, reindex
version={version}
name=reindex
classname=org.opensearch.index.reindex.ReindexPlugin
java.version=11
opensearch.version={version}
extended.plugins=
has.native.controller=false
"""


def artifact(jar: Path) -> str:
    """commons-codec-1.18.0.jar -> commons-codec: a jar's name without its version."""
    return re.sub(r"-\d[^-]*$", "", jar.stem)


def main(downloads: Path, target: Path, version: str) -> None:
    archive = downloads / f"opensearch-{version}.zip"
    if not archive.is_file():
        sys.exit(f"{archive} is missing: Maven did not fetch OpenSearch {version}")
    staging = target.with_name(target.name + ".partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(staging)
    inner = staging / f"opensearch-{version}"
    home = staging / "home"
    inner.rename(home)

    reindex = home / "modules" / "reindex"
    reindex.mkdir(parents=True)
    in_lib = {artifact(jar) for jar in (home / "lib").glob("*.jar")}
    for jar in sorted(downloads.glob("*.jar")):
        if artifact(jar) not in in_lib:  # the server's own copy wins: two copies of a class fail the start
            shutil.copy2(jar, reindex / jar.name)
    (reindex / "plugin-descriptor.properties").write_text(REINDEX_DESCRIPTOR.format(version=version))

    for path in [home, *home.rglob("*")]:  # as root, the node runs as an unprivileged user: it must read all
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
                   | (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else 0))
    for script in (home / "bin").iterdir():
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    shutil.rmtree(target, ignore_errors=True)
    home.rename(target)
    shutil.rmtree(staging)
    print(f"OpenSearch {version} installed in {target} (modules: "
          f"{', '.join(sorted(p.name for p in (target / 'modules').iterdir()))})")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
