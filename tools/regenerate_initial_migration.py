"""Developer tool: regenerate the initial migration from the models (before the first release).

Once a release has shipped, never regenerate: add a new revision with
``alembic revision --autogenerate`` semantics via consortium_server.db.migrate instead.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from alembic import command

from consortium_server.db.migrate import MIGRATIONS_DIR, alembic_config
from consortium_server.db.session import make_engine


def main() -> int:
    versions = MIGRATIONS_DIR / "versions"
    with tempfile.TemporaryDirectory() as tmp:
        # Later hand-written revisions (0002 ...) depend on 0001: park them while it is rebuilt.
        parked = Path(tmp) / "parked"
        parked.mkdir()
        later = [p for p in versions.glob("*.py") if not p.name.startswith("0001_")]
        for path in later:
            shutil.move(str(path), parked / path.name)
        old = list(versions.glob("0001_*.py"))
        try:
            for path in old:
                shutil.move(str(path), parked / path.name)
            engine = make_engine(f"sqlite:///{Path(tmp) / 'gen.db'}")
            command.revision(
                alembic_config(engine), message="initial schema", autogenerate=True, rev_id="0001"
            )
            engine.dispose()
        except BaseException:
            for path in old:
                shutil.move(str(parked / path.name), path)
            raise
        finally:
            for path in later:
                shutil.move(str(parked / path.name), path)
    (path,) = versions.glob("0001_*.py")
    text = path.read_text()
    text = text.replace("astext_type=Text()", "astext_type=sa.Text()")
    text = re.sub(r"Create Date: .*\n", "", text)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
