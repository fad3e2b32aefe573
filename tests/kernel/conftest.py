"""The kernel tier: the host side boots one VM; the tests in ``inside/`` run only in that VM.

On the host, ``inside/`` is never collected (its tests need ESP in the kernel, which this machine's
kernel lacks); ``test_vm.py`` boots the guest once and runs them there. In the guest
(``FABMESH_KERNEL_GUEST=1``) only ``inside/`` is run, by the command ``test_vm.py`` builds.
"""

from __future__ import annotations

import os

GUEST_ENV = "FABMESH_KERNEL_GUEST"
ARTIFACTS_ENV = "FABMESH_KERNEL_ARTIFACTS"  # a host directory the guest may write (its logs on failure)

collect_ignore = [] if os.environ.get(GUEST_ENV) == "1" else ["inside"]
