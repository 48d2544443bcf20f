"""krea2kit plugin: the NudeNet detector as an image content filter.

Registers the image filter ``nudenet``. Importing this module is cheap: nudenet, OpenCV and
onnxruntime are imported only when the filter is loaded.
"""

from krea2kit.hookspecs import hookimpl
from krea2kit.registry import FilterDescriptor

__version__ = "0.1.0"
KREA2KIT_CONTRACT = 2  # the krea2kit plugin contract this plugin is written for


@hookimpl
def register_filters(register):
    register(FilterDescriptor(
        name="nudenet",
        summary="NudeNet 320n detector (offline, model in the nudenet wheel): blocks exposed "
                "genitalia, breasts, buttocks, anus; flags covered ones. nudenet ships AGPL-3.0 "
                "licence files.",
        load="krea2kit_nudenet.filter:load",
        options="krea2kit_nudenet.filter:NudeNetOptions",
        target="image",
        version=__version__,
    ))
