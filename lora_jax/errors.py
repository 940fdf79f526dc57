"""User-facing errors: one line that names the problem and the fix."""


class UserError(Exception):
    """A bad input from the user (path, task, config key, data).

    `train.py` prints ``error: <message>`` on one line and exits with status 2; nothing is written
    to the workdir before inputs are validated.
    """


DISTRIBUTION = "lora-jax"  # the name in pyproject.toml; it is not on PyPI


def extra_install_hint(extra: str) -> str:
    """How to install an optional extra of pyproject.toml, e.g. for ``lorahub``:
    ``pip install 'cma>=3.3' (the [lorahub] extra: pip install -e '.[lorahub]' in the
    repository)``. The packages come from this install's metadata; the project is installed from
    its repository, so ``pip install 'lora-jax[...]'`` would look for it on PyPI and fail."""
    import importlib.metadata
    import re
    import shlex

    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
        requires = []
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    packages = [r.split(";")[0].strip() for r in requires if marker.search(r)]
    editable = f"pip install -e '.[{extra}]' in the repository"
    if not packages:
        return editable
    return f"pip install {' '.join(shlex.quote(p) for p in packages)} (the [{extra}] extra: " \
           f"{editable})"
