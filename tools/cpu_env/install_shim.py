"""Install the CPU torchvision shim into the active interpreter's site-packages (test env only)."""

import pathlib
import shutil
import sysconfig

site = pathlib.Path(sysconfig.get_paths()["purelib"])
here = pathlib.Path(__file__).parent
shutil.copy(here / "moref_torchvision_cpu_shim.py", site / "moref_torchvision_cpu_shim.py")
pth = "import moref_torchvision_cpu_shim; moref_torchvision_cpu_shim.install()\n"  # .pth: one line, run at startup
(site / "moref_torchvision_cpu_shim.pth").write_text(pth)
print(f"installed torchvision CPU shim into {site}")
