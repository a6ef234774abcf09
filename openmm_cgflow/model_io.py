"""Saving and loading a trained flow together with the molecule it belongs to (``flow.pt``).

One file holds everything backmapping and retraining need, so ``cgflow backmap RUN_DIR ...`` works on
another machine: the flow's constructor arguments and weights, and the :class:`~openmm_cgflow.systems.CGSystem`
(OpenMM System as XML, topology with its bonds, reference positions in nm, temperature in K, CG dihedrals
and chiral centres). A system built from the registry (``builtin(name)``) also stores its registered name
and options; one that cannot be written as data (no atoms to describe, e.g. Mueller-Brown) is stored by
its name only and rebuilt through the registry. Writes go through
:func:`openmm_cgflow_plugin.files.atomic_write`, so a crash never leaves half a file.

The file holds tensors, numeric arrays and plain data only and is read with ``torch.load(weights_only=True)``
(:mod:`openmm_cgflow.safe_files`): a crafted file cannot run code when it is loaded. (The System XML it
carries is deserialised by OpenMM; a System with a PythonForce unpickles that force's function: share
flow.pt files of Systems without PythonForce only, or check ``payload["system"]["system_xml"]`` first.)
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import openmm
import openmm.app as app
import torch
from openmm_cgflow_plugin.files import atomic_write

from . import registry, systems
from .flow import ConditionalFlow
from .safe_files import check_plain, load_plain, to_numpy, to_plain

__all__ = ["save_model", "load_model", "model_bytes", "system_to_dict", "system_from_dict"]

FORMAT = "openmm-cgflow-model/1"


def system_to_dict(cgsystem) -> dict:
    """Plain-data description of a CGSystem (strings, lists, arrays) from which it can be rebuilt."""
    named = {"name": cgsystem.name}
    if cgsystem.builtin is not None:
        named.update(builtin=cgsystem.builtin, builtin_options=dict(cgsystem.builtin_options))
        if not cgsystem.cg_atoms:  # nothing atomistic to describe: rebuilt from the registry by name
            return named
    buf = io.StringIO()
    app.PDBFile.writeFile(cgsystem.topology, cgsystem.positions * 10.0 * openmm.unit.angstrom, buf)
    atom_index = {atom: i for i, atom in enumerate(cgsystem.topology.atoms())}
    bonds = [(atom_index[a], atom_index[b]) for a, b in cgsystem.topology.bonds()]
    return {
        **named,
        "system_xml": openmm.XmlSerializer.serialize(cgsystem.system),
        "pdb": buf.getvalue(),
        "bonds": bonds,
        "positions_nm": np.asarray(cgsystem.positions, dtype=np.float64),
        "temperature_K": float(cgsystem.temperature),
        "cg_atoms": [list(map(int, q)) for q in cgsystem.cg_atoms],
        "cg_names": list(cgsystem.cg_names),
        "chiral_centres": [list(map(int, q)) for q in getattr(cgsystem.coordinates, "chiral_centres", [])],
    }


def system_from_dict(d: dict):
    """Inverse of :func:`system_to_dict`."""
    if "system_xml" not in d:
        return registry.builtin(d["builtin"], **d.get("builtin_options", {}))
    system = openmm.XmlSerializer.deserialize(d["system_xml"])
    topology = _topology_with_bonds(app.PDBFile(io.StringIO(d["pdb"])).topology, d["bonds"])
    cgsystem = systems.from_openmm(
        system, topology, np.asarray(to_numpy(d["positions_nm"]), dtype=np.float64), float(d["temperature_K"]), [tuple(q) for q in d["cg_atoms"]],
        name=d["name"], cg_names=d["cg_names"], chiral_centres=[tuple(q) for q in d["chiral_centres"]],
    )
    cgsystem.builtin = d.get("builtin")
    cgsystem.builtin_options = dict(d.get("builtin_options", {}))
    return cgsystem


def _topology_with_bonds(source: app.Topology, bonds) -> app.Topology:
    """A copy of ``source`` (chains, residues, atoms) whose bonds are exactly ``bonds`` (pairs of 0-based atom
    indices): the stored bond list is authoritative, a PDB's CONECT records are incomplete."""
    topology = app.Topology()
    atoms = []
    for chain in source.chains():
        new_chain = topology.addChain(chain.id)
        for residue in chain.residues():
            new_residue = topology.addResidue(residue.name, new_chain, residue.id, residue.insertionCode)
            for atom in residue.atoms():
                atoms.append(topology.addAtom(atom.name, atom.element, new_residue, atom.id))
    topology.setPeriodicBoxVectors(source.getPeriodicBoxVectors())
    for i, j in bonds:
        topology.addBond(atoms[int(i)], atoms[int(j)])
    return topology


def model_bytes(flow: ConditionalFlow, cgsystem, **extra) -> bytes:
    """The bytes of the ``flow.pt`` that :func:`save_model` writes (tensors, numeric arrays and plain data only)."""
    payload = {
        "format": FORMAT,
        "flow_hparams": dict(flow.hparams),
        "flow_dtype": str(flow.dtype).replace("torch.", ""),
        "flow_state": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
        "system": system_to_dict(cgsystem),
        "extra": extra,
    }
    buf = io.BytesIO()
    torch.save(to_plain(payload, "flow.pt"), buf)
    check_plain(buf.getvalue(), "flow.pt payload")
    return buf.getvalue()


def save_model(path: str | os.PathLike, flow: ConditionalFlow, cgsystem, **extra) -> str:
    """Write the flow (constructor arguments, dtype, weights) and its CGSystem to ``path`` atomically;
    returns the SHA-256 of the bytes written.

    ``extra`` (plain data: numbers, strings, lists, arrays) is stored alongside and returned by
    :func:`load_model` with ``return_extra=True``.
    """
    data = model_bytes(flow, cgsystem, **extra)
    with atomic_write(path) as fh:
        fh.write(data)
    return hashlib.sha256(data).hexdigest()


def load_model(path: str | os.PathLike, return_extra: bool = False):
    """Read a file written by :func:`save_model` -> ``(flow, cgsystem)`` (and ``extra`` if asked).

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for one that is not a
    complete openmm-cgflow model, or that holds Python objects beyond tensors, numeric arrays and plain data
    (:class:`~openmm_cgflow.safe_files.UnsafeFileError`: nothing in it is run).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "flow.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    payload = load_plain(path, "model file")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an openmm-cgflow model file (expected format {FORMAT!r})")
    missing = [k for k in ("flow_hparams", "flow_dtype", "flow_state", "system") if k not in payload]
    if missing:
        raise ValueError(f"model file {path} is incomplete: missing {', '.join(missing)}")
    if payload["flow_dtype"] not in ("float32", "float64"):
        raise ValueError(f"model file {path}: unknown flow dtype {payload['flow_dtype']!r}")
    cgsystem = system_from_dict(payload["system"])
    hp = dict(payload["flow_hparams"])
    flow = ConditionalFlow(dtype=getattr(torch, payload["flow_dtype"]), **hp)
    flow.load_state_dict(payload["flow_state"])
    flow.eval()
    if return_extra:
        return flow, cgsystem, payload.get("extra", {})
    return flow, cgsystem
