#!/bin/bash
# The lifecycle suite (enable, three rotations, disable under continuous
# traffic, 0 lost) with no encapsulation: the pool's ipipMode and vxlanMode
# are Never, so every path between nodes is protected by ESP tunnel mode
# over the pod blocks (see test_lifecycle.sh).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
E2E_POOL_MODE=Never exec "$here/test_lifecycle.sh"
