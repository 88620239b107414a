#!/bin/bash
# build.sh [OUTDIR]  -- build guest kernel + initramfs + sample vfat stick images.
# Weilan's copy of the shared usb-hil harness (adds the HID gadget function for BadUSB tests).
# Default OUTDIR: $HIL_OUT or /tmp/usb-hil.  Needs root (apt-get) the first time.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(realpath -m "${1:-${HIL_OUT:-/tmp/usb-hil}}")
mkdir -p "$OUT"

need=(qemu-system-x86_64:qemu-system-x86 busybox:busybox-static mkfs.vfat:dosfstools
      mcopy:mtools cpio:cpio depmod:kmod socat:socat python3:python3-minimal)
miss=()
for p in "${need[@]}"; do command -v "${p%%:*}" >/dev/null || miss+=("${p#*:}"); done
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q dynamic && miss+=(busybox-static)
if [ ${#miss[@]} -gt 0 ]; then
  apt-get update -qq
  # Machines of this kind ship a backported qemu-utils that Breaks Debian 12's
  # qemu-system-common; take qemu-utils at the version of qemu-system-x86 instead.
  qv=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends --allow-downgrades \
    "${miss[@]}" "qemu-utils=$qv"
fi

# --- guest kernel: the Debian linux-image package, unpacked (host kernel untouched)
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || { apt-get update -qq; KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
KVER=${KPKG#linux-image-}
KX="$OUT/kernel/$KVER"
if [ ! -f "$KX/boot/vmlinuz-$KVER" ]; then
  mkdir -p "$OUT/kernel/dl" && chmod 777 "$OUT/kernel/dl"
  ( cd "$OUT/kernel/dl" && apt-get download "$KPKG" )
  rm -rf "$KX.tmp" && dpkg -x "$OUT"/kernel/dl/"$KPKG"_*.deb "$KX.tmp"
  depmod -b "$KX.tmp" "$KVER" && mv "$KX.tmp" "$KX"
fi
cp "$KX/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
# uncompressed ELF vmlinux: qemu boots it via PVH (no SeaBIOS, no decompression: ~2.5 s faster under TCG)
off=$(python3 -c 'import sys; print(open(sys.argv[1],"rb").read().find(b"\xfd7zXZ\x00"))' "$OUT/vmlinuz")
rm -f "$OUT/vmlinux"
if [ "$off" -gt 0 ] && tail -c +$((off + 1)) "$OUT/vmlinuz" | xz -dc 2>/dev/null > "$OUT/vmlinux.tmp"; [ -s "$OUT/vmlinux.tmp" ]; then
  mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
else rm -f "$OUT/vmlinux.tmp"; fi

# --- initramfs: static busybox + modules + init
R="$OUT/initramfs.d"; rm -rf "$R"
mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,media,hil,lib/modules}
cp /bin/busybox "$R/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
MODS="usb-storage uas sd_mod xhci-pci ehci-pci uhci-hcd ohci-pci vfat msdos exfat
      nls_cp437 nls_iso8859-1 nls_utf8 nls_ascii virtio_pci virtio_net 9pnet_virtio 9p
      virtio_blk virtio_console virtio-rng loop ext4
      usbhid hid-generic evdev"   # the last three: badge readers (USB keyboards) as input devices
GADGET_MODS="dummy_hcd libcomposite usb_f_mass_storage usb_f_hid"   # copied, loaded on demand by hil-gadget
MD="$KX/lib/modules/$KVER"
mkdir -p "$R/lib/modules/$KVER"
for m in $MODS $GADGET_MODS; do
  modprobe -d "$KX" -S "$KVER" --show-depends "$m" | awk '$1=="insmod"{print $2}'
done | sort -u | while read -r ko; do
  rel=${ko#"$MD/"}; mkdir -p "$R/lib/modules/$KVER/$(dirname "$rel")"; cp "$ko" "$R/lib/modules/$KVER/$rel"
done
cp "$MD"/modules.{order,builtin,builtin.modinfo} "$R/lib/modules/$KVER/"
depmod -b "$R" "$KVER"
echo "$MODS" | tr -s ' \n' '\n\n' | sed '/^$/d' > "$R/etc/hil-modules"
# udev.cpio.gz: systemd-udevd + rules from Debian's udev package + the glibc libs they need; run.sh --udev
# appends it to the initramfs (the kernel unpacks concatenated cpio archives) and init starts udevd
UX="$OUT/udev"; U="$OUT/udev.d"; rm -rf "$U" "$OUT/udev.cpio.gz"
if [ ! -x "$UX/bin/udevadm" ]; then
  mkdir -p "$OUT/kernel/dl" && chmod 777 "$OUT/kernel/dl" && rm -f "$OUT"/kernel/dl/udev_*.deb
  ( cd "$OUT/kernel/dl" && apt-get download udev ) && rm -rf "$UX.tmp" && dpkg -x "$OUT"/kernel/dl/udev_*.deb "$UX.tmp" && mv "$UX.tmp" "$UX"
fi
if [ -x "$UX/bin/udevadm" ] && ! ldd "$UX/bin/udevadm" "$UX"/lib/udev/*_id | grep -q 'not found'; then
  mkdir -p "$U/bin" "$U/lib/systemd" "$U/lib/udev" "$U/etc/udev"
  cp "$UX/bin/udevadm" "$U/bin/udevadm"; ln -s /bin/udevadm "$U/lib/systemd/systemd-udevd"
  cp -a "$UX/lib/udev/rules.d" "$UX"/lib/udev/*_id "$U/lib/udev/"
  ldd "$UX/bin/udevadm" "$UX"/lib/udev/*_id | grep -o '/[^ ]*' | grep -v "^$UX" | sort -u |
    while read -r l; do mkdir -p "$U$(dirname "$l")"; cp -L "$l" "$U$l"; done
  ( cd "$U" && find . | LC_ALL=C sort | cpio -o -H newc --quiet ) | gzip -1 > "$OUT/udev.cpio.gz"
  rm -rf "$U"
else
  echo "build.sh: warning: no udev for the guest (package or libs missing); run.sh --udev won't work" >&2
fi
cp "$HERE/guest/init" "$R/init"; chmod 755 "$R/init"
cp "$HERE/guest/uevent-hook" "$R/sbin/hil-uevent-hook"; cp "$HERE/guest/gadget" "$R/sbin/hil-gadget"
chmod 755 "$R/sbin/hil-uevent-hook" "$R/sbin/hil-gadget"
echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
printf '%s\n' root:x:0: tty:x:5: disk:x:6: lp:x:7: kmem:x:15: dialout:x:20: cdrom:x:24: tape:x:26: \
  audio:x:29: video:x:44: plugdev:x:46: render:x:105: sgx:x:106: kvm:x:107: input:x:108: > "$R/etc/group"
( cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet ) | gzip -1 > "$OUT/initramfs.cpio.gz"
rm -rf "$R"

# --- sample USB stick images: stick1 = MBR + one FAT32 partition (like a real stick), stick2 = no partition table
"$HERE/mkstick.sh" "$OUT/stick1.img" STICK1 64 mbr >/dev/null
"$HERE/mkstick.sh" "$OUT/stick2.img" STICK2 64 raw >/dev/null
echo "$KVER" > "$OUT/KVER"
echo "built: $OUT/{vmlinux,vmlinuz,initramfs.cpio.gz,stick1.img,stick2.img} (kernel $KVER)"
