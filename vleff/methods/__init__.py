"""One folder per method: ``vleff/methods/<name>/``.

Each folder is a package whose ``__init__`` imports the method's public names and registers its
:class:`~vleff.registry.Method` entry; :mod:`vleff.registry` finds methods by listing this
package's subpackages, so adding a method means adding its folder, not editing a list.
"""
