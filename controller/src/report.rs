//! Reports as files people open in a spreadsheet.

use betang_proto::v1::UsageReportResponse;

/// Unix milliseconds as `YYYY-MM-DD HH:MM` UTC.
pub fn utc(ms: i64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)) else {
        return ms.to_string();
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

/// The usage report as CSV, one row per institution, with a header row.
pub fn usage_csv(r: &UsageReportResponse) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "institution_id",
        "code",
        "name",
        "from_utc",
        "to_utc",
        "vps_count",
        "vcpu_hours",
        "memory_gib_hours",
        "disk_gib_hours",
        "cpu_used_hours",
    ])?;
    for i in &r.institutions {
        w.write_record([
            i.institution_id.clone(),
            i.code.clone(),
            i.name.clone(),
            utc(r.from_ms),
            utc(r.to_ms),
            i.vps_count.to_string(),
            format!("{:.3}", i.vcpu_hours),
            format!("{:.3}", i.memory_gib_hours),
            format!("{:.3}", i.disk_gib_hours),
            format!("{:.3}", i.cpu_used_hours),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use betang_proto::v1::InstitutionUsage;

    use super::*;

    #[test]
    fn the_csv_quotes_what_needs_quoting() {
        let r = UsageReportResponse {
            from_ms: 1_793_491_200_000,
            to_ms: 1_796_083_200_000,
            institutions: vec![InstitutionUsage {
                institution_id: "i-1".into(),
                code: "dinkes".into(),
                name: "Dinas Kesehatan, \"Kota\" Palangka Raya".into(),
                vps_count: 3,
                vcpu_hours: 1440.0,
                memory_gib_hours: 2880.5,
                disk_gib_hours: 14400.0,
                cpu_used_hours: 12.3456,
            }],
        };
        let csv = usage_csv(&r).unwrap();
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some(
                "institution_id,code,name,from_utc,to_utc,vps_count,vcpu_hours,\
                 memory_gib_hours,disk_gib_hours,cpu_used_hours"
            )
        );
        assert_eq!(
            lines.next(),
            Some(
                "i-1,dinkes,\"Dinas Kesehatan, \"\"Kota\"\" Palangka Raya\",2026-11-01 00:00,\
                 2026-12-01 00:00,3,1440.000,2880.500,14400.000,12.346"
            )
        );
        assert_eq!(lines.next(), None);
    }
}
