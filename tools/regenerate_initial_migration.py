"""Developer tool: regenerate the initial migration from the models (before the first release).

Once a release has shipped, never regenerate: add a new revision with
``alembic revision --autogenerate`` semantics via consortium_server.db.migrate instead.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from alembic import command

from consortium_server.db.migrate import MIGRATIONS_DIR, alembic_config
from consortium_server.db.session import make_engine


def main() -> int:
    for old in (MIGRATIONS_DIR / "versions").glob("0001_*.py"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'gen.db'}")
        command.revision(
            alembic_config(engine), message="initial schema", autogenerate=True, rev_id="0001"
        )
        engine.dispose()
    (path,) = (MIGRATIONS_DIR / "versions").glob("0001_*.py")
    text = path.read_text()
    text = text.replace("astext_type=Text()", "astext_type=sa.Text()")
    text = re.sub(r"Create Date: .*\n", "", text)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
