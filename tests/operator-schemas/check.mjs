// Checks Prometheus Operator objects against the operator's CRD schemas, with the models of
// @kubernetes-models/prometheus-operator (generated from the operator's released CRDs; the
// version is pinned in package.json beside this file). tests/deploy.rs runs it.
//
//   node check.mjs validate FILE...   every document must be an object of a kind the
//                                     package has a schema for, and pass it
//   node check.mjs json FILE          every document as one line of JSON (the test compares
//                                     the operator objects with the plain files through it)
//
// The packages are found in $OPERATOR_SCHEMAS_MODULES, else in target/operator-schemas/
// node_modules, where .ci/run installs them (`npm ci` from this folder's lock file). They
// are loaded by path, so this script needs no node_modules of its own beside it.
//
// What the schemas catch: required fields (a rule without `expr`), types (`for: 5`),
// patterns (a duration like "5 minutes"), enums (`role: node` for `Node`). What they do
// not: a field the schema does not have is accepted here (the API server prunes it, or
// refuses it under strict field validation); tests/deploy.rs compares the objects with the
// plain files field by field, which catches that for the fields we ship.

import { readFileSync, existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const modules =
  process.env.OPERATOR_SCHEMAS_MODULES ||
  resolve(here, "../../target/operator-schemas/node_modules");

async function load(path) {
  const file = join(modules, path);
  if (!existsSync(file)) return null;
  return import(pathToFileURL(file).href);
}

const yaml = await load("yaml/dist/index.js");
if (!yaml) {
  console.error(`no yaml package under ${modules} (.ci/run installs it: npm ci in target/operator-schemas)`);
  process.exit(2);
}

function documents(file) {
  const docs = yaml.parseAllDocuments(readFileSync(file, "utf8"));
  const out = [];
  for (const d of docs) {
    if (d.errors.length) throw new Error(`${file}: ${d.errors.map((e) => e.message).join("; ")}`);
    const v = d.toJS();
    if (v !== null && v !== undefined) out.push(v);
  }
  return out;
}

/// The model class for `apiVersion` and `kind`, or why there is none.
async function model(apiVersion, kind) {
  const [group, version] = String(apiVersion).split("/");
  if (!group || !version || !/^[A-Za-z0-9]+$/.test(String(kind))) {
    return { why: `not an API object (apiVersion ${apiVersion}, kind ${kind})` };
  }
  const m = await load(`@kubernetes-models/prometheus-operator/${group}/${version}/${kind}.js`);
  if (!m || !m[kind]) return { why: `no schema for ${apiVersion} ${kind}` };
  return { cls: m[kind] };
}

async function validate(files) {
  let failed = 0;
  for (const file of files) {
    let docs;
    try {
      docs = documents(file);
    } catch (e) {
      console.log(`${file}: ${e.message}`);
      failed++;
      continue;
    }
    for (const doc of docs) {
      const name = `${doc.kind}/${doc.metadata?.name}`;
      const { cls, why } = await model(doc.apiVersion, doc.kind);
      if (!cls) {
        console.log(`${file}: ${name}: ${why}`);
        failed++;
        continue;
      }
      try {
        new cls(doc).validate();
        console.log(`${file}: ${doc.apiVersion} ${name} passed`);
      } catch (e) {
        console.log(`${file}: ${doc.apiVersion} ${name} failed: ${e.message}`);
        failed++;
      }
    }
  }
  return failed === 0 ? 0 : 1;
}

const [command, ...args] = process.argv.slice(2);
if (command === "validate" && args.length > 0) {
  process.exit(await validate(args));
} else if (command === "json" && args.length === 1) {
  for (const doc of documents(args[0])) console.log(JSON.stringify(doc));
} else {
  console.error("usage: check.mjs validate FILE... | check.mjs json FILE");
  process.exit(2);
}
