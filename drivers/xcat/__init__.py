"""The xcat boot and power drivers: xCAT's `nodeset`, `rpower`, `nodestat`.

Laid out as Ironic's drivers/modules/redfish/:

  boot.py      XcatBoot: `chdef` (the job's kernel line) + `nodeset`, read back
  power.py     XcatPower: `rpower`
  site.py      the site table's image store; `nodestat` progress
  common.py    the drivers' property (xcat_node) and a node's xCAT name
  commands.py  running xCAT's commands and reading their per-node answers
  batch.py     gathering per-node calls from many job threads into one command

Every call is per node (a job's thread), but the commands run per batch:
calls arriving within `settings.xcat.batch_window` become one command of up
to `batch_size` nodes, so 200 jobs ending together cost a few `nodeset`
processes, not 200.
"""

from imgfarm.drivers.xcat.batch import batcher
from imgfarm.drivers.xcat.boot import XcatBoot, target_of
from imgfarm.drivers.xcat.common import xcat_name
from imgfarm.drivers.xcat.power import XcatPower
from imgfarm.drivers.xcat.site import NodeStatus, site_table, xcat_image_store, xcat_node_status

__all__ = ["NodeStatus", "XcatBoot", "XcatPower", "batcher", "site_table", "target_of",
           "xcat_image_store", "xcat_name", "xcat_node_status"]
