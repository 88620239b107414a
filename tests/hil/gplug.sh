#!/bin/bash
# gplug.sh IMAGE [SERIAL] [options]  -- plug IMAGE as a USB stick emulated *inside* the guest
# (dummy_hcd + configfs mass-storage gadget): unlike plug.sh every identity field is settable.
#  --vid 0x0951 --pid 0x1666 --manufacturer S --product S --bcd 0x0100 --inquiry 'VENDOR  PRODUCT.........REV '
#  --name NAME (default g-SERIAL)  --ro  --fixed (removable=0)  --copy (private copy)  --nowait  --timeout S (30)
#  --hid (add a keyboard interface: storage+HID composite, BadUSB)
# exit: 0 ok, 3 gadget bound but no sdX appeared in time (e.g. blocked by the agent), other = error
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); RUN=${HIL_RUN:-${HIL_OUT:-/tmp/usb-hil}/run}
[ $# -ge 1 ] || { sed -n '2,7p' "$0" >&2; exit 2; }
img=$1; shift; serial=HILGADGET0001
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then serial=$1; shift; fi
vid=0x0951 pid=0x1666 manuf=HIL prod="HIL Gadget Stick" bcd=0x0100 inq= name= ro=0 rem=1 copy=0 wait=30 hid=0
while [ $# -gt 0 ]; do
  case $1 in
    --vid) vid=$2; shift;; --pid) pid=$2; shift;; --manufacturer) manuf=$2; shift;; --product) prod=$2; shift;;
    --bcd) bcd=$2; shift;; --inquiry) inq=$2; shift;; --name) name=$2; shift;; --timeout) wait=${2%.*}; shift;;
    --ro) ro=1;; --fixed) rem=0;; --copy) copy=1;; --nowait) wait=0;; --hid) hid=1;;
    *) echo "gplug.sh: unknown option $1" >&2; exit 2;;
  esac; shift
done
[ -f "$img" ] || { echo "gplug.sh: no such image $img" >&2; exit 2; }
name=${name:-g-$(echo "$serial" | tr -c 'A-Za-z0-9_\n-' _)}
dst=$RUN/share/files/gadget-$name.img; rm -f "$dst"
if [ $copy = 1 ] || ! ln "$(realpath "$img")" "$dst" 2>/dev/null; then cp --sparse=always "$img" "$dst"; fi
q() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
cmd="hil-gadget plug $(q "$name") $(q "/hil/files/gadget-$name.img") $(q "$vid") $(q "$pid") $(q "$serial")"
cmd+=" $(q "$manuf") $(q "$prod") $(q "$bcd") $ro $rem $(q "$inq") $wait $hid"
exec "$HERE/gexec.sh" -t $((wait + 30)) "$cmd"
