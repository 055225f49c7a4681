#!/bin/sh
# Runs INSIDE the debootstrapped root (chroot, clean environment) to turn it into the VM image of
# tests/vm: packages from /root/packages.txt, two users, 9p mounts, multi-user.target by default
# (GDM is not started at boot until the suite has installed the project and set graphical.target).
# Part of the image's cache key (tests/vm/image.py): changing it rebuilds the image.
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 LANG=C.UTF-8
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
apt_install() {
  apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 "$@"
}

# No daemon may start inside the chroot.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d

echo spicevm > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 spicevm\n' > /etc/hosts

apt-get update -q

# The initrd must carry the virtio disk and console drivers and 9p: configure initramfs-tools before
# the kernel is installed, so the kernel's postinst builds the initrd once, with them.
apt_install initramfs-tools
for m in virtio_pci virtio_blk virtio_console 9p 9pnet_virtio; do
  grep -qx "$m" /etc/initramfs-tools/modules || echo "$m" >> /etc/initramfs-tools/modules
done

# shellcheck disable=SC2046
apt_install $(sed -e 's/#.*//' /root/packages.txt | tr -s ' \n' ' ')

# Check the initrd: each module is in it or built into the kernel.
kver=$(ls /lib/modules | head -n1)
listing=$(lsinitramfs "/boot/initrd.img-$kver")
for m in virtio_pci virtio_blk virtio_console 9p 9pnet_virtio; do
  if ! echo "$listing" | grep -q "/$m\.ko" && ! grep -q "/$m\.ko\$" "/lib/modules/$kver/modules.builtin"; then
    echo "guest_setup: the initrd has no $m" >&2
    exit 1
  fi
done

# Users: alice (GDM autologin) and bob (a second session on VT 3). Passwords = names.
useradd -m -u 1001 -U -s /bin/bash -c Alice alice
useradd -m -u 1002 -U -s /bin/bash -c Bob bob
printf 'alice:alice\nbob:bob\nroot:root\n' | chpasswd

# A fixed machine id: with an empty one every -snapshot boot would be a "first boot" (preset-all).
systemd-machine-id-setup

# Shares from the host (QEMU -virtfs): the .deb and guest scripts (read-only), results (writable).
mkdir -p /mnt/share /mnt/results
cat > /etc/fstab <<'EOF'
/dev/vda  /             ext4  rw,errors=remount-ro                 0 1
share     /mnt/share    9p    trans=virtio,version=9p2000.L,ro,nofail  0 0
results   /mnt/results  9p    trans=virtio,version=9p2000.L,rw,nofail  0 0
EOF

# GDM is installed but not started until the project is in: the suite sets graphical.target.
systemctl set-default multi-user.target
# Nothing periodic may run during a test.
systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
  man-db.timer dpkg-db-backup.timer 2>/dev/null || true
# The journal persists across the suite's reboot (the first boot's journal helps debugging).
mkdir -p /var/log/journal

rm -f /usr/sbin/policy-rc.d
# No `apt-get clean`: /var/cache/apt/archives is the host's download cache, bind-mounted; image.py
# leaves the image's own archive directory empty once it is unmounted.
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /root/packages.txt
