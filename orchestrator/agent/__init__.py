"""Host agent: everything densitylab reads or writes under /sys, /proc and tracefs.

Stdlib only, so the same files run on this machine (`python3 -m orchestrator.agent`),
on a lab machine and inside a lab-host VM, shipped there as one zipapp
(`python3 agent.pyz SUBCOMMAND`, see orchestrator/agentship.py). The parts import each
other relatively, which is what lets them run under either package name:

- fs: the small file helpers and AgentError; cmd: the one external command runner
- ksm: KSM knobs (apply and restore) and counters
- sample: the sampler (KSM counters, ksmd CPU, /proc/vmstat, meminfo, per-process KSM)
- trace: the rmap_walk_ksm latency collectors (tracefs kprobes, BPF, proxy)
- memory: swap, memory cgroups, reclaim, memory blocks, move_pages
- probe: the capability probes `densitylab doctor` prints
- procs: detached processes and the agent's own helpers found in /proc
- leftovers: what a killed run left behind; cli: the one dispatch table of subcommands
"""
