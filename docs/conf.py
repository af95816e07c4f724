"""Sphinx configuration of the hypergradient site (``make docs``).

The API reference is read from the docstrings (Google style with Sphinx roles, as in optax) by
autodoc and napoleon, always through the public names (``hypergradient.Dynamics``, not the module
that defines it), so moving code between internal modules does not break the site. The tutorial
notebooks are executed on every build (myst-nb); a failing cell fails the build. Nothing is
fetched: no intersphinx, no remote fonts.
"""

import inspect
import re

from sphinx.util import logging

import hypergradient

logger = logging.getLogger(__name__)

project = "hypergradient"
author = "the hypergradient authors"
copyright = "the hypergradient authors"
release = version = hypergradient.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_nb",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]
root_doc = "index"

# -- the API reference ----------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True  # `hyper_optimizer=None`, not the object a default evaluates to
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" of a NamedTuple as fields of its docstring: autodoc would otherwise describe each
# field a second time (as "Alias for field number 0") and Sphinx warns about the duplicate.
napoleon_use_ivar = True
napoleon_use_rtype = False
add_module_names = False
nitpicky = True


def _public_target(app, env, node, contnode):
    """Resolve a docstring's reference to an internal path through the public name.

    The docstrings refer to objects where they are defined (``~hypergradient.errors.Failure``,
    ``~hypergradient.drivers.offline.OptimizeResult``), or by bare name inside their module
    (``:func:`box```); the reference documents each object once, under its public name
    (``hypergradient.Failure``, ``hypergradient.constraints.box``). A target whose last
    component is documented under exactly one public name links there.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    if not (target.startswith("hypergradient.") or "." not in target):
        return None
    domain = env.get_domain("py")
    name = target.rsplit(".", 1)[-1]
    found = [full for full in domain.objects if full.rsplit(".", 1)[-1] == name and full.startswith("hypergradient.")]
    if len(found) != 1:
        return None
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], found[0], node, contnode)


def _one_name_per_entry(app, what, name, obj, options, lines):
    """``best_hparams, best_value, best_step: ...`` in an Attributes section reads as a type and a
    name to Sphinx's field lists; ``best_hparams/best_value/best_step`` reads as one name."""
    for i, line in enumerate(lines):
        m = re.match(r"^(\s+)(\w+(?:, \w+)+):(\s)", line)
        if m:
            lines[i] = m[1] + m[2].replace(", ", "/") + ":" + line[m.end(2) + 1:]


def _every_public_name_documented(app, env):
    """Warn (an error under -W) for a public name that no page of the reference documents: every
    name ``hypergradient/__init__.py`` exports (modules aside) and ``hg.constraints.__all__``."""
    documented = set(env.get_domain("py").objects)
    public = {f"hypergradient.{name}" for name, value in vars(hypergradient).items()
              if not name.startswith("_") and not inspect.ismodule(value)}
    public |= {f"hypergradient.constraints.{name}" for name in hypergradient.constraints.__all__}
    for name in sorted(public - documented):
        logger.warning("%s is public but the API reference does not document it: add it to a page of docs/api/", name)


def setup(app):
    app.connect("missing-reference", _public_target)
    app.connect("env-check-consistency", _every_public_name_documented)
    app.connect("autodoc-process-docstring", _one_name_per_entry, priority=400)  # before napoleon (500)


# Warnings are errors (``-W``) and every reference must resolve (``-n``), except:
nitpick_ignore_regex = [
    # annotations naming other libraries' types (jax.Array, optax's GradientTransformation,
    # collections.abc.Callable): nothing is fetched, so there is no inventory to link them to
    ("py:class", r"(?!hypergradient\.)\w+(\.\w+)+"),
    # annotations naming the library's private types (hypergradient._pytree.Skeleton)
    ("py:class", r"hypergradient(\.\w+)*\._\w+(\.\w+)*"),
]
nitpick_ignore = [
    ("py:class", "Params"),  # the alias `Params = Any` of the annotations
    # References in public docstrings to names that are not public (so not in the reference):
    ("py:func", "train"),  # Dynamics.run: hypergradient.dynamics.train
    ("py:mod", "hypergradient.precision"),  # value_and_grad
    ("py:func", "normalized"),  # optim.adam: a private helper of optim.py
    ("py:class", "Row"),  # Plan.rows: hypergradient.planning.Row is not exported
    ("py:class", "hypergradient.planning.Row"),
]


# -- pages and notebooks --------------------------------------------------------------------
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3  # the existing pages link to each other's sections (tune.md#hybrid-...)
nb_execution_mode = "force"  # every build runs the tutorials: they cannot rot
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# -- the site -------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "hypergradient"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "use_download_button": True,
}
