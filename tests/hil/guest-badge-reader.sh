#!/bin/sh
# Runs in the guest (busybox sh). A badge reader of the common kind — a USB HID boot
# keyboard that "types" the card number and Enter — emulated with dummy_hcd and the
# configfs HID function (usb_f_hid). The host side is the real usbhid/hid-generic/evdev.
#   badge-reader plug [VID] [PID]   bind it (default 0x0c27:0x3bfa); prints the event node
#   badge-reader swipe DIGITS       type DIGITS then Enter, as the reader does for a card
#   badge-reader event-node         the /dev/input/eventN of the reader
#   badge-reader unplug
set -e
CFG=/sys/kernel/config/usb_gadget
g=$CFG/badge
node() {
  for e in /sys/class/input/event*; do
    [ "$(cat "$e/device/id/vendor" 2>/dev/null)" = "${1:-0c27}" ] && { echo "/dev/input/${e##*/}"; return 0; }
  done
  return 1
}
report() { # eight-byte boot keyboard report with one key (usage id), then all keys up
  printf "\\000\\000\\$(printf %03o "$1")\\000\\000\\000\\000\\000" > /dev/hidg0
  printf '\000\000\000\000\000\000\000\000' > /dev/hidg0
}
case "$1" in
plug)
  vid=${2:-0x0c27} pid=${3:-0x3bfa}
  hil-gadget setup
  modprobe usb_f_hid
  used=$(cat $CFG/*/UDC 2>/dev/null || true)
  udc=; for u in $(ls /sys/class/udc); do echo "$used" | grep -qx "$u" || { udc=$u; break; }; done
  [ -n "$udc" ] || { echo "no free UDC" >&2; exit 1; }
  mkdir "$g"
  echo "$vid" > $g/idVendor; echo "$pid" > $g/idProduct; echo 0x0200 > $g/bcdUSB
  mkdir $g/strings/0x409
  echo HIL > $g/strings/0x409/manufacturer; echo "HIL Badge Reader" > $g/strings/0x409/product
  echo BADGE0001 > $g/strings/0x409/serialnumber
  mkdir -p $g/configs/c.1/strings/0x409 $g/functions/hid.usb0
  echo "Badge reader" > $g/configs/c.1/strings/0x409/configuration
  echo 1 > $g/functions/hid.usb0/protocol; echo 1 > $g/functions/hid.usb0/subclass
  echo 8 > $g/functions/hid.usb0/report_length
  printf '\005\001\011\006\241\001\005\007\031\340\051\347\025\000\045\001\165\001\225\010\201\002\225\001\165\010\201\003\225\005\165\001\005\010\031\001\051\005\221\002\225\001\165\003\221\003\225\006\165\010\025\000\045\145\005\007\031\000\051\145\201\000\300' > $g/functions/hid.usb0/report_desc
  ln -s $g/functions/hid.usb0 $g/configs/c.1/
  echo "$udc" > $g/UDC
  v=$(echo "${vid#0x}" | tr A-F a-f)
  for i in $(seq 500); do
    [ -c /dev/hidg0 ] && n=$(node "$v") && { echo "$n"; exit 0; }
    usleep 10000
  done
  echo "no input device for the badge reader after 5 s" >&2; exit 3 ;;
swipe)
  digits=$2
  while [ -n "$digits" ]; do
    d=${digits%"${digits#?}"}; digits=${digits#?}
    case $d in 0) report 39 ;; [1-9]) report $((29 + d)) ;; esac
  done
  report 40 ;;
event-node) node "${2:-0c27}" ;;
unplug)
  echo "" > $g/UDC 2>/dev/null || true
  rm -f $g/configs/c.1/hid.usb0
  rmdir $g/configs/c.1/strings/0x409 $g/configs/c.1 $g/functions/hid.usb0 $g/strings/0x409 $g ;;
*) sed -n '2,9p' "$0"; exit 2 ;;
esac
