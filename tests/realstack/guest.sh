# Runs inside the real-stack VM (see vm.py), as PID 1 on the host's read-only root.
# $1: the writable results folder. Starts the system D-Bus, two pairs of btvirt virtual
# controllers (hci0/hci1 legacy Bluetooth 4.0 LE-only, hci2/hci3 Bluetooth 5 with
# extended advertising; each pair shares its own "air"), then for each Privacy mode a
# fresh bluetoothd with that main.conf, a btmon trace and one Python process running the
# checks (checks.py). Everything it learns goes to $1 as JSON and btsnoop traces.
R="$1"
HERE="$(dirname "$0")"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${REALSTACK_PYTHON:-$REPO/.venv/bin/python}"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$REPO" HOME=/tmp
up() { cut -d' ' -f1 /proc/uptime; }
log() { echo "$(up) $*" >> "$R/guest.log"; }

mount -t proc proc /proc
mount -t sysfs sys /sys
log "guest up"
modprobe hci_vhci || log "modprobe hci_vhci failed"
mkdir -p /run/dbus /run/realstack
cat > /run/realstack/dbus.conf <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path=/run/dbus/system_bus_socket</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_type="method_call"/>
<allow send_type="signal"/><allow send_type="method_return"/><allow send_type="error"/>
<allow receive_type="method_call"/><allow receive_type="signal"/><allow receive_type="method_return"/>
<allow receive_type="error"/></policy></busconfig>
EOF
dbus-daemon --config-file=/run/realstack/dbus.conf --fork || log "dbus-daemon failed"

count() { ls /sys/class/bluetooth | grep -c '^hci'; }
dead() {  # controllers the kernel made by itself (no ACL buffers: nobody answers it)
  hciconfig -a 2>/dev/null | grep -c 'ACL MTU: 0:0'
}
# The kernel's vhci gives a client 1 s to say what controller it wants, then makes a
# default one that nobody drives: btvirt's first start from 9p under TCG can be slower
# than that. So: warm it, and start a pair again (bounded) until both controllers live.
cat /usr/bin/btvirt >/dev/null; btvirt -h >/dev/null 2>&1
start_pair() {  # $1: btvirt's options; $2: controllers expected afterwards
  for try in 1 2 3; do
    btvirt $1 >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 50); do [ "$(count)" -ge "$2" ] && break; sleep 0.1; done
    sleep 0.5
    [ "$(count)" -ge "$2" ] && [ "$(dead)" = 0 ] && return 0
    log "btvirt $1: try $try gave $(count) controllers, $(dead) dead"
    kill $pid; wait $pid
    # its controllers (the kernel's default one too) leave with it, not at once: the next
    # try must start from the controllers there were before, or it counts leftovers
    for _ in $(seq 50); do [ "$(count)" -le $(( $2 - 2 )) ] && break; sleep 0.1; done
    [ "$(count)" -le $(( $2 - 2 )) ] || log "btvirt $1: $(count) controllers still there after try $try"
    sleep 0.5
  done
  return 1
}
start_pair -U2 2 || log "no legacy pair"    # Bluetooth 4.0 LE-only controllers
start_pair -l2 4 || log "no extended pair"  # Bluetooth 5 BR/EDR+LE controllers (LE only here)
log "controllers $(ls /sys/class/bluetooth | tr '\n' ' ')"

powered() {  # every adapter Powered, through D-Bus (btmgmt prints nothing without a terminal)
  for a in $(ls /sys/class/bluetooth | grep '^hci'); do
    case " $POWERED " in *" $a "*) continue;; esac
    busctl get-property org.bluez /org/bluez/$a org.bluez.Adapter1 Powered 2>/dev/null | grep -q true || return 1
    POWERED="$POWERED $a"
  done
}

phase() {  # $1: a name for the results; $2: bluetoothd's Privacy; the rest: checks.py's options
  name=$1 privacy=$2; shift 2
  printf '[General]\nControllerMode = le\nExperimental = true\nPrivacy = %s\n[Policy]\nAutoEnable = true\n' \
    "$privacy" > /run/realstack/main.conf
  btmon -w "$R/trace-$name.btsnoop" >/dev/null 2>&1 &
  BTMON=$!
  bluetoothd -n -E -f /run/realstack/main.conf >"$R/bluetoothd-$name.log" 2>&1 &
  BTD=$!
  ok=0; POWERED=""
  for _ in $(seq 40); do powered && { ok=1; break; }; sleep 0.5; done
  log "$name: privacy=$privacy bluetoothd ready=$ok"
  if [ $ok = 1 ]; then
    timeout 300 "$PY" -m tests.realstack.checks --privacy "$privacy" --phase "$name" --out "$R" "$@" \
      >>"$R/checks-$name.log" 2>&1
    log "$name: checks exit=$?"
  fi
  kill $BTD; wait $BTD
  kill $BTMON; wait $BTMON
}

# REALSTACK_PRIVACY (from the kernel command line, vm.run_vm's env): the btvirt phases to run
for privacy in ${REALSTACK_PRIVACY:-off device}; do
  [ "$privacy" = none ] && continue
  phase "$privacy" "$privacy"
done

# bumble controllers with the project's radio model through vhci (agent.ble.bumble): RSSI
# from the path-loss model, and legacy-only chips that refuse a new random address while
# they scan, as real ones do (btvirt accepts it and reports RSSI 127)
if [ -z "${REALSTACK_NO_BUMBLE:-}" ]; then
  "$PY" -m agent.ble.bumble.vhci rx=0,0:legacy near=1,0:legacy far=8,0 --seed 1 >"$R/vhci.log" 2>&1 &
  VHCI=$!
  for _ in $(seq 180); do grep -q '"ready"' "$R/vhci.log" && break; sleep 0.5; done
  log "bumble controllers: $(grep -c public_address "$R/vhci.log") attached"
  phase bumble off --vhci "$R/vhci.log"
  kill $VHCI; wait $VHCI
fi
log "done"
sync
poweroff -f
