# Functions of the boot image's /init, kept apart so tests can run them on a
# made-up /sys tree (SYS=DIR) with the host's busybox sh.

SYS=${SYS:-/sys}

# cmdline_value NAME [CMDLINE]: the value of the last NAME=VALUE word (empty if none).
cmdline_value() {
    _name=$1
    _line=${2-$(cat /proc/cmdline)}
    _found=
    for _word in $_line; do
        case $_word in
            "$_name"=*) _found=${_word#*=} ;;
        esac
    done
    echo "$_found"
}

# The modaliases of the devices whose drivers bring up a NIC: PCI network
# controllers (class 02), virtio PCI devices (their transport) and virtio NICs.
NIC_ALIASES='^pci:.*bc02|^pci:v00001AF4|^virtio:d00000001v'

# device_aliases [ERE]: the devices' modaliases (each once, sorted), those ERE matches if given.
device_aliases() {
    cat "$SYS"/bus/*/devices/*/modalias 2>/dev/null | sort -u | grep -E "${1:-.}"
}

# bootif_mac 01-AA-BB-CC-DD-EE-FF -> aa:bb:cc:dd:ee:ff (pxelinux IPAPPEND 2 form; empty if not one).
bootif_mac() {
    _v=$(echo "$1" | tr 'A-F' 'a-f')
    case $_v in
        01-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f])
            echo "${_v#01-}" | tr '-' ':' ;;
    esac
}

# ether_nics: the Ethernet interfaces (type 1, not loopback), sorted by name.
ether_nics() {
    for _dev in "$SYS"/class/net/*; do
        [ -e "$_dev/address" ] || continue
        _n=${_dev##*/}
        [ "$_n" = lo ] && continue
        [ "$(cat "$_dev/type" 2>/dev/null)" = 1 ] || continue
        echo "$_n"
    done | sort
}

# nic_by_mac MAC: the interface with that address.
nic_by_mac() {
    _want=$(echo "$1" | tr 'A-F' 'a-f')
    for _n in $(ether_nics); do
        [ "$(cat "$SYS/class/net/$_n/address")" = "$_want" ] && { echo "$_n"; return 0; }
    done
    return 1
}

# nic_with_link: the first interface (by name) whose carrier is up.
nic_with_link() {
    for _n in $(ether_nics); do
        [ "$(cat "$SYS/class/net/$_n/carrier" 2>/dev/null)" = 1 ] && { echo "$_n"; return 0; }
    done
    return 1
}

# choose_nic BOOTIF NICPARAM: the boot NIC by the rule BOOTIF= (a MAC) first, then
# imgfarm.nic= (an interface name or a MAC), then the first with a link. Prints the
# name, or on failure one line saying why on stderr and returns 1.
choose_nic() {
    _bootif=$1
    _param=$2
    if [ -n "$_bootif" ]; then
        _mac=$(bootif_mac "$_bootif")
        if [ -z "$_mac" ]; then
            echo "BOOTIF=$_bootif is not a MAC in the 01-aa-bb-cc-dd-ee-ff form" >&2
            return 1
        fi
        nic_by_mac "$_mac" && return 0
        echo "no network interface has the BOOTIF address $_mac (found: $(ether_nics | tr '\n' ' '))" >&2
        return 1
    fi
    if [ -n "$_param" ]; then
        case $_param in
            *:*) nic_by_mac "$_param" && return 0 ;;
            *) [ -e "$SYS/class/net/$_param/address" ] && { echo "$_param"; return 0; } ;;
        esac
        echo "imgfarm.nic=$_param names no network interface (found: $(ether_nics | tr '\n' ' '))" >&2
        return 1
    fi
    nic_with_link && return 0
    if [ -z "$(ether_nics)" ]; then
        echo "no Ethernet interface found (no driver for this NIC in the boot image?)" >&2
    else
        echo "no network interface has a link (found: $(ether_nics | tr '\n' ' '))" >&2
    fi
    return 1
}

# wait_for_disk SECONDS: until a disk (not a loop, RAM or optical device) is there.
wait_for_disk() {
    _left=$1
    while :; do
        for _b in "$SYS"/block/*; do
            case ${_b##*/} in loop*|ram*|sr*|zram*|'*') continue ;; esac
            return 0
        done
        [ "$_left" -gt 0 ] || return 1
        sleep 1
        _left=$((_left - 1))
    done
}
