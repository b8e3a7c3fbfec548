"""Refresh the console's vendored front-end libraries from the npm registry.

The console needs no Node build: each library ships a ready file (an ES module or a UMD script),
which is copied with its licence into `src/chatgate/console/static/vendor/<name>-<version>/`.
The version is in the path, so those files can be cached for a year (`console/assets.py`).

    python scripts/vendor_console.py          # fetch the pinned versions below (needs `npm`)

To upgrade one, change its version here, run the script, update the paths in `index.html`
and `app.js` to the new directory, run the browser tests, and commit the result.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).resolve().parent.parent / "src" / "chatgate" / "console" / "static" / "vendor"

# package, version, directory name, {file in the package: name in the directory}
PINNED: list[tuple[str, str, str, dict[str, str]]] = [
    ("marked", "18.2.1", "marked", {"lib/marked.esm.js": "marked.esm.js", "LICENSE": "LICENSE"}),
    (
        "dompurify",
        "3.5.0",
        "dompurify",
        {"dist/purify.es.mjs": "purify.es.mjs", "LICENSE": "LICENSE"},
    ),
    (
        "@highlightjs/cdn-assets",
        "11.12.0",
        "highlight.js",
        {
            "es/highlight.min.js": "highlight.min.js",
            "styles/github.min.css": "github.min.css",
            "styles/github-dark.min.css": "github-dark.min.css",
            "LICENSE": "LICENSE",
        },
    ),
    ("chart.js", "4.6.1", "chart.js", {"dist/chart.umd.min.js": "chart.umd.min.js", "LICENSE.md": "LICENSE.md"}),
]


def fetch(package: str, version: str, into: Path) -> Path:
    """`npm pack` verifies the tarball against the registry's integrity hash."""
    out = subprocess.run(  # noqa: S603 - fixed arguments: the pinned names above
        ["npm", "pack", "--silent", f"{package}@{version}"],  # noqa: S607 - npm from PATH
        cwd=into,
        check=True,
        capture_output=True,
        text=True,
    )
    return into / out.stdout.strip().splitlines()[-1]


def main() -> int:
    if VENDOR.exists():
        shutil.rmtree(VENDOR)
    VENDOR.mkdir(parents=True)
    sums: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for package, version, name, files in PINNED:
            tarball = fetch(package, version, Path(tmp))
            target = VENDOR / f"{name}-{version}"
            target.mkdir()
            with tarfile.open(tarball) as archive:
                for source, dest in files.items():
                    member = archive.extractfile(f"package/{source}")
                    if member is None:
                        raise SystemExit(f"{package}@{version} has no {source}")
                    data = member.read()
                    (target / dest).write_bytes(data)
                    sums.append(f"{hashlib.sha256(data).hexdigest()}  {target.name}/{dest}")
            print(f"vendored {package}@{version} -> {target.relative_to(VENDOR.parent.parent)}")
    (VENDOR / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
