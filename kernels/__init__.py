"""stg_ext's Triton kernels. setup.py installs this folder as ``stg_ext.kernels``; that is its only name.

Why the code below: the folder sits at the top of the checkout, so wherever the checkout's root is on sys.path
(``python -m pytest``, ``python -c`` run in it, ``PYTHONPATH=.``) a plain ``import kernels`` finds this folder
before Hugging Face's ``kernels`` package, which transformers >= 5.25 depends on and imports when it loads a
model (``from kernels import ...`` in transformers/integrations/hub_kernels.py). Imported under that name, this
file hands the name to the ``kernels`` package found elsewhere on sys.path, or fails as a missing package would.
"""
import importlib.machinery
import importlib.util
import os
import sys

if __name__ == "kernels":
    def _load_kernels_from_elsewhere():
        checkout = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        elsewhere = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != checkout]
        spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
        if spec is None:
            raise ModuleNotFoundError(
                "No module named 'kernels' outside this checkout (its kernels/ folder is stg_ext.kernels)",
                name="kernels")
        module = importlib.util.module_from_spec(spec)
        # The import system returns what sys.modules holds under the name once this file has run.
        sys.modules["kernels"] = module
        spec.loader.exec_module(module)

    _load_kernels_from_elsewhere()
